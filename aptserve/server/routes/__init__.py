"""One router per resource: videos (REST jobs), streaming (sync HTTP and WebSocket), system (health, metrics, demo)."""
