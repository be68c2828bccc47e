"""The core: what happens to each saved tensor (hooks, handles, regions, recompute, policies,
budgets, errors) and the `Runtime` state they share."""
