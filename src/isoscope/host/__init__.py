"""What the host shows through /proc and the cgroup filesystem: cgroups, isolation stacks, VMs, WASM, steal, memory."""
