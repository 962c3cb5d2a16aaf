"""Writes the R1 arrival process that ships with the package (`python/ares/workloads/data/`).

From the ServeGen DeepSeek-R1 folder (alibaba/ServeGen@f891d118:data/reason/deepseek-r1/, Apache-2.0) it keeps
only the arrival parameters (`ts,rate,cv,dist,p1,p2` per 600 s window) of the clients the sampler uses (those with
length data), and only the windows where a client is active: a few hundred kB of the 13 MB folder, enough for
`ares.workloads.servegen.r1_arrival_times` to draw the same arrival times without the folder.

    python benchmark/pack_r1_arrivals.py [--folder DIR]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io

from ares.workloads.servegen import PACKED_ARRIVALS, load_clients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=None, help="ServeGen deepseek-r1 folder (default: under $ARES_DATA_DIR)")
    args = ap.parse_args()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["client", "window", "ts", "rate", "dist", "p1", "p2"])
    for c in load_clients(args.folder):
        for k in range(len(c.rate)):
            if c.rate[k] > 0:
                w.writerow([c.name, k, repr(float(c.window_ts[k])), repr(float(c.rate[k])), c.dist[k],
                            repr(float(c.p1[k])), repr(float(c.p2[k]))])  # fmt: skip
    # mtime=0: the same input gives the same bytes.
    PACKED_ARRIVALS.write_bytes(gzip.compress(buf.getvalue().encode(), mtime=0))
    print(f"wrote {PACKED_ARRIVALS} ({PACKED_ARRIVALS.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
