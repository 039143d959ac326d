"""Data sets: MVTec-AD layout, CIFAR-10/100 one-class, plain folders, and the built-in demo set."""
