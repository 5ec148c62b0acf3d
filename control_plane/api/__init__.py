"""The API edge: every protobuf conversion (``convert``) and both front ends — gRPC servicers
and the MQTT bridge — which authenticate, convert and delegate to the services the same way
(``agent_calls``). Domain errors become status codes in one place (``status``)."""
