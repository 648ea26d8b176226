"""Modbus TCP: grid meter input, the EMS server, register maps (pymodbus framers over trio)."""
