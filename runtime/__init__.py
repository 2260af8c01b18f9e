"""runtime stage of pocketlm."""
