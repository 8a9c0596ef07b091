"""qlora.model"""
