"""Secure aggregation (Bonawitz et al.): the phases' messages, Shamir sharing, masks, the device's and the server's sides."""
