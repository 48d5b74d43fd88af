"""Running the inventory on a cluster: resources, plan, preflight, launch, calibrate."""
