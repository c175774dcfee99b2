"""Who sent a span: connection peer → process → cgroup → container → pod, and Kubernetes pod metadata."""
