"""The builder machine's side of remote builders: `kiosk builder-serve`, run over ssh by devices and laptops."""
