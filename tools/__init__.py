"""Developer and CI tools of the mmmod source tree (not shipped in the wheel)."""
