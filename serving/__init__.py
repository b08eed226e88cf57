"""serving — the Ray Serve application: HTTP ingress, model replicas, controller, training and merge actors."""
