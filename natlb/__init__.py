"""natlb: a userspace NAT load balancer with its data path in C (see README.md)."""
