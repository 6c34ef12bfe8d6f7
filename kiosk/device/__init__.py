"""The device side: generations, switching and recovery, activation, the push hooks."""
