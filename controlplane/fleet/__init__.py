"""Deployments, placement, desired-state revisions and their rollout to nodes."""
