"""qlora.train"""
