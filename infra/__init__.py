"""Settings, bootstrap and launchers: how the pipeline is configured and where it runs."""
