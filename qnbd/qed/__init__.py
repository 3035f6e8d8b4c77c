"""The QED format (qemu docs/interop/qed_spec.txt): the second format of the registry."""
