"""Scale-out on Ray Serve: an ingress in front of engine replicas, each agent routed to the
replica that owns its slot (placement.py), hints split by owner, failover by replica rank.
Optional: `pip install scalesim[ray]`; nothing here is imported when one engine serves."""
