"""(populated by later modules)"""
