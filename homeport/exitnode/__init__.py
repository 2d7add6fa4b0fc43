"""``homeport exit-node``: a public exit server on a cloud VM in one command.

``cli`` is the click group; ``provision`` the create/list/delete flows;
``civo`` the API client; ``render`` and ``templates/`` the first-boot script,
cloud-config and systemd units; ``material`` the node's token and TLS
certificate; ``store`` what is kept locally; ``ready`` the pinned health check.
See deploy/civo-exit-node/README.md.
"""
