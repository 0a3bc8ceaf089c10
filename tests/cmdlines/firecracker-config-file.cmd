sudo ./firecracker --api-sock /tmp/firecracker.socket --config-file <path_to_the_configuration_file>
