"""quantize stage of pocketlm."""
