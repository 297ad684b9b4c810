"""flare22 appliance."""
