"""The parts of the data path methods use: attention capture and edits, conditioning, the schedule."""
