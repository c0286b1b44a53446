"""The `attnseg` command line. It sits above both sides: it starts the API (service/) and the
worker (workers/), and talks to a running service as a client."""
