"""Live CPU cluster benchmark: the same request list replayed through one ARES router per placement policy, on one
set of real SGLang servers, with the servers' own KV, retraction and prediction figures (`ares bench live`)."""
