"""The networks and datasets the command line knows by name."""
