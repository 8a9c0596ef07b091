"""qlora.nn"""
