"""What the experiment scripts share; the scripts in experiments/ are the commands on top."""
