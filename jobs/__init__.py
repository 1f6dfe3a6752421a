"""FLARE job recipes and Client API scripts."""
