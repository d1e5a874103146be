"""DataModules: MVTec-style folders, one-class labelled sets, collision events, generators."""
