"""export stage of pocketlm."""
