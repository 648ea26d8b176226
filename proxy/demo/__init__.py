"""The demo and its simulated OCPP peers (asyncio); never imported by the runtime."""
