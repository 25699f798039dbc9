"""kubedpo operator."""
