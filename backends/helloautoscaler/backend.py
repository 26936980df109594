"""The autoscaler guide's example: the hello-world counter, announcing itself to the autoscaler
and reporting its load every ten seconds through the notify helpers."""

import threading
import time

import notify
from flask import abort


class Backend():
    def __init__(self, container_id, master_token, control_server_url, send_data):
        started = time.time()
        self.id = container_id
        self.master_token = master_token
        self.control_server_url = control_server_url
        self.count = 0
        self.total_requests_received = 0
        self.interval_requests_received = 0
        self.report_interval = 10
        self.data = {"id": self.id, "mtoken": self.master_token}
        # without load_time the autoscaler would not know this server has loaded
        notify.loaded(data=self.data, autoscaler_address=self.control_server_url,
                      load_time=time.time() - started, max_perf=0.5)
        threading.Thread(target=self.report_load_forever).start()

    def report_load_forever(self):
        while True:
            cur_load = self.interval_requests_received / self.report_interval
            notify.update(self.data, self.control_server_url, cur_load, self.total_requests_received)
            self.interval_requests_received = 0
            time.sleep(self.report_interval)

    def count_request(self):
        self.total_requests_received += 1
        self.interval_requests_received += 1


def increment_handler(backend, request):
    backend.count_request()
    if "amount" in request.json.keys():
        backend.count += request.json["amount"]
        return "Incremented"
    abort(400)


def value_handler(backend, request):
    backend.count_request()
    return {"value": backend.count}


flask_dict = {
    "POST": {
        "increment": increment_handler
    },
    "GET": {
        "value": value_handler
    }
}
