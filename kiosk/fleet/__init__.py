"""Fleets: one spec to many kiosks, from an Ansible inventory, pushed in waves without a server.

inventory (Ansible's YAML and INI formats, group_vars/ and host_vars/) -> merge (each host's spec:
the base spec overridden by its groups' and its own variables) -> rollout (waves over the devices'
own configuration.git, through remote) and commands (`kiosk fleet show|build|push|status|discover`).
"""
