"""The null-space experiment: does the part of a step that the batch cannot see matter?"""
