"""The configuration layer: what a spec renders to, the same at image build time and on the device at every push."""
