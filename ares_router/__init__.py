"""The ARES router process and its pure placement/rebalancing policy (`ares_router.policy`)."""
