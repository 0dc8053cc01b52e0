"""The modules of the ISS server beside the top level's ``iss.py`` (the app) and ``storage.py`` (the store).

See ARCHITECTURE.md for which module does what.
"""
