"""Pipeline stages as plain, tested functions; the Prefect flows in pipelines/ only wire them."""
