"""The /v1 API and the health endpoints, one router per resource."""
