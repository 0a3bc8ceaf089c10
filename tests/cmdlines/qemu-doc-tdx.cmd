qemu-system-x86_64 \
    -accel kvm \
    -cpu host \
    -object tdx-guest,id=tdx0 \
    -machine q35,confidential-guest-support=tdx0 \
    -bios OVMF.fd
