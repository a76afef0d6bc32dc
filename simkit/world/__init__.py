"""The simulated world: devices, topology, flow-level network, energy, availability (no torch)."""
