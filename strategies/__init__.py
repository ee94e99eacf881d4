"""Flower server strategies that aggregate synthetic sets (FedDistill and friends).

This package depends on `fedcl` and on Flower; `fedcl`'s core never imports it.
"""
