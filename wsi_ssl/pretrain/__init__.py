"""wsi_ssl.pretrain"""
