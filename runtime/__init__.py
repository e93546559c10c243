"""What fedsilo's deployment processes run on: Flower's process environment, key material, patches over Flower."""
