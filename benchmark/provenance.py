"""Where a benchmark's numbers came from (`ares.provenance`), importable by the scripts here, which run as
`python benchmark/NAME.py` and so find this module beside them."""

from ares.provenance import commit_label, git_state, record

__all__ = ["commit_label", "git_state", "record"]
