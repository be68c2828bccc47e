"""The bridge to the scheduler: policy="auto" measures a step (`profile`), asks `scheduler` for a
plan and carries it out (`policy`)."""
