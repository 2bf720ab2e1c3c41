"""Scaling-law studies: `sweep` trains a list of sizes under one budget, `fit` fits L(N) and L(C) power laws."""
