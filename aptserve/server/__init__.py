"""The aptserve HTTP and WebSocket service: app, routes, scheduler, engine worker, job store, metrics."""
