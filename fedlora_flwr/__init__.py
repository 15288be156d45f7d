"""fedlora-flwr: personalized federated learning with low-rank adaptation on Flower."""
